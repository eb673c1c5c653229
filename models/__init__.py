"""Model loading, pulling and Hugging Face attention integration."""

from sacli.cli import main

main()

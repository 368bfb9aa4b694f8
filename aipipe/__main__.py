from aipipe.cli.app import main

main()

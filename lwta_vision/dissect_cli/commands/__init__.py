"""One module per ``dissect.py`` subcommand; each is a function whose signature is its command line."""

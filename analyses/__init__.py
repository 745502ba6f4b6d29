"""Figure and table scripts: each takes run folders and writes PNG and HTML (see README.md)."""

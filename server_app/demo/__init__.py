"""`koala demo`: one command that runs a whole KOALA deployment on this machine (see launcher.py)."""

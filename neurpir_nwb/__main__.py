"""Run the command-line program with ``python -m neurpir_nwb``."""

from neurpir_nwb.cli import main

if __name__ == "__main__":
    main()

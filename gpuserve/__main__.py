"""`python -m gpuserve` is the `gpuserve` command."""

from gpuserve.cli import main

if __name__ == "__main__":
    main()

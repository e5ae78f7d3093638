"""``python -m lowbit`` (and ``torchrun ... -m lowbit``): the command line."""

from lowbit.cli import main

main()

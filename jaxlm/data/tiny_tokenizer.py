"""Moved to jaxlm.demo.tokenizers (the from-scratch demo); this path keeps working."""
from jaxlm.demo.tokenizers import *  # noqa: F401,F403
from jaxlm.demo.tokenizers import build, main, texts  # noqa: F401

if __name__ == '__main__':
  main()

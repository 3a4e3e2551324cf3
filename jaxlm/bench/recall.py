"""Moved to jaxlm.demo.recall (the from-scratch demo's bench); this path keeps working."""
from jaxlm.demo.recall import *  # noqa: F401,F403
from jaxlm.demo.recall import main  # noqa: F401

if __name__ == '__main__':
  main()

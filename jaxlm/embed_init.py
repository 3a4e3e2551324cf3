"""Moved to jaxlm.demo.embed_init (the from-scratch demo); this path keeps working."""
from jaxlm.demo.embed_init import compose_embeddings, init_hook, main, piece_splits  # noqa: F401

if __name__ == '__main__':
  main()

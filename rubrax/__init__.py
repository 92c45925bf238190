"""rubrax: rubric-based reward modelling and RL post-training of LLMs in JAX.

Implements "Chasing the Tail: Effective Rubric-based Reward Modeling for LLM
Post-Training" (arXiv 2509.21500). Importing the top-level package is cheap: it
does not import jax, so host-side tools (rubric elicitation, grading) start fast.
"""

__version__ = "0.1.0"

"""Evaluation: log-likelihood and generative scoring, the task registry (BoolQ, MMLU, C-Eval,
perplexity, ...) and the lm-evaluation-harness adapter."""

"""Methods built from the training, sampling and evaluation jobs: the self-consuming retraining
loop (and, in later issues, unlearning and regularised fine-tuning)."""

"""The probes' names, for the command line's help without importing the probes (torch, nnsight); catalog.py
checks at import that they are its own."""

NAMES = ("logit-lens", "accuracy", "ffn-readout", "ffn-transplant", "ffn-ablation", "nback", "attention",
         "activation-patching", "linear-probe", "logit-difference", "induction", "icl-score")

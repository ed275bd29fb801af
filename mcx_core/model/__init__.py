"""The frozen base model and what it reads: the MegaContext tree, the working context, horizon scoring."""

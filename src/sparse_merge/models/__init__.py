"""Models: ParamSpace genomes, HF loading and saving, toy models and tokenizers."""

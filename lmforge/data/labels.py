"""The label of a position whose next token does not count in a loss (a prompt, padding): the value
`torch.nn.functional.cross_entropy` and Hugging Face ignore by default."""

IGNORE = -100

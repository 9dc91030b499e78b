"""Constants shared by every layer of minimind_fast."""

IGNORE_INDEX = -100
"""Label value that contributes neither loss nor gradient (PyTorch's and MiniMind's convention)."""

PAD_TOKEN_ID = 0  # <|endoftext|>
BOS_TOKEN_ID = 1  # <|im_start|>
EOS_TOKEN_ID = 2  # <|im_end|>
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

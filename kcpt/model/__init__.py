"""Models and tokenizers: the demo/HF tokenizer (``tokenizer``), base/reference model loading, tokenizer audit."""

"""Files in and out: Hugging Face model folders, tokenizer files, data files and record schemas."""

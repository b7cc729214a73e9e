"""parity.tokenizer"""

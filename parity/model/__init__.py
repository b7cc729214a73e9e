"""parity.model"""

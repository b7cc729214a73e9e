"""parity.engine"""

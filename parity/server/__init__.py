"""parity.server"""

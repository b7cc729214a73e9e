"""parity.plan"""

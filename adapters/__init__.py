"""Integration adapters behind small protocols: sandbox, code host, agent, notifier.

Activities use these; workflows never import them.
"""

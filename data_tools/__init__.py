"""Corpus preparation for bilm: raw text in, shards + vocabulary + manifest out.

``python -m data_tools prepare ...`` (also mounted as ``bilm prepare``); see
``data_tools.prepare``.
"""

"""Wire contracts: JSON Schema files beside this module plus fast orjson codecs.

A stage talks to the next only through a topic and one of these contracts.
"""

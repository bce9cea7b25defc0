"""Adapters that let other libraries run selfattn's engines. They only adapt: nothing in
selfattn imports them, and each needs its own extra.

    selfattn.integrations.transformers   Hugging Face transformers' AttentionInterface
                                         (the 'hf' extra: pip install 'selfattn[hf]')

This package imports none of them, so ``import selfattn.integrations`` never needs an extra.
"""

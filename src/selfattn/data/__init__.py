"""Data shipped with selfattn.

``tinyshakespeare.txt``: the "tiny Shakespeare" corpus of char-rnn and nanoGPT (1,115,394
characters, 65 distinct; Shakespeare's plays, public domain; sha256
86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed). `selfattn train` reads it
through `importlib.resources` (see `selfattn.train.data`), so it works offline and installed.
"""

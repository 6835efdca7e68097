"""Data: the bundled tasks' webdataset shards (writers, reader, the digits and scenes tasks),
caption formats, and the check of ``--train-data``/``--val-data`` before training starts."""

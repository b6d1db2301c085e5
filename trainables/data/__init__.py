"""The data package: a LLaVA-format dataset from files on disk to batches on a worker.

    records  the files and their records: structure, ids, what is wrong (one line each)
    images   image files found safely inside the dataset and decoded faithfully (the one `load`)
    tokens   chat-template tokenization: labels on assistant turns only, one <image> token
    shards   tokenized splits as memory-mapped Arrow files, shared by every trial and worker
    check    the check before Ray starts, which builds the shards: what it passes, trials can use
    loader   torch DataLoader over a shard: images decoded lazily in loader processes, seeded order

    python -m trainables.data DIR      # check a dataset with the zoo's tokenizer; every problem, one line each
"""

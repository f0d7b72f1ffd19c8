"""`smfd bench`: sparse memory finetuning against LoRA and full finetuning on the same documents.

Every method learns the same documents, one at a time, from the same training texts with the
same passes, batch size and sequence length; then each is measured on what it learned (cloze
probes of the documents) and on what it kept (HellaSwag, facts the base model knew, held-out
NLL, next-token drift from the base model), with its speed and peak memory.

Entry point: `smfd.bench.runner.main(argv)`. Modules: `data` (input files, held-out split,
training texts), `methods` (method specs and trainers), `runner` (command line, workers,
evaluation), `report` (results.json, results.md, the learning-vs-forgetting plot).
"""

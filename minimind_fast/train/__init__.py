"""Helpers of the training loop (minimind_fast/pretrain.py), one concern per module, plain
functions:

- cli: flags (MiniMind's names), validation with one-line errors, per-preset defaults
- data_setup: corpus/tokenizer/token cache -> held-out split -> datasets -> resumable sharded
  loaders
- distributed: torchrun/DDP init and teardown, rank helpers, collectives
- precision: dtype choice, autocast, GradScaler (float16 only)
- optim: AdamW groups (no decay on norms/biases/embeddings), clip + non-finite skip, activation
  checkpointing
- schedule: warmup + cosine LR as a pure function of the optimizer step
- checkpoint: atomic checkpoints, resume state (weights are read by interop.load_weights)
- metrics: FLOPs/MFU, progress output, JSONL/wandb/TensorBoard, loss-curve PNG
"""

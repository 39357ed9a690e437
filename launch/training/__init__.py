"""The training engine shared by every launcher: recipe schema, runtime and DeepSpeed set-up, the step loop and
its non-finite policy, checkpoints and the run folder, schedules, optimizers (TBGN included), seeding, data
streams, augmentation and logs. See docs/architecture.md."""

"""Learning stage: surprise, the lesson (distillation), slot selection and the sparse update; the learner owns the model."""

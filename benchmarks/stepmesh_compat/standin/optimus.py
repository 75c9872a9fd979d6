"""Stand-in for StepFun's internal ``optimus`` module, which two StepMesh scripts import and never use."""

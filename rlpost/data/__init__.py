"""What flows through a run (layer 3): samples and their batches, datasets read from
files, scored trajectories made into training data, the seeded epoch stream, prompts as
token ids."""

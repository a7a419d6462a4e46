"""The actors: GenerationActor, WeightReceiverActor, SessionActor, MemoryGovernor."""

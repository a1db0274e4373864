"""The server's round, in one place: the collection of one round's results and the decision to
accept each (`collection`), the registry store (`store`), the MQTT fleet (`fleet`) and the
orchestrator that drives the engine's round loop over them (`orchestrator`)."""

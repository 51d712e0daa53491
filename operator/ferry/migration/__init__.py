"""The LiveMigration state machine (PURE): ``machine.decide`` over an ``observation.Observation``,
``admission.admit`` for the queue, ``actions`` for the side effects it asks for."""

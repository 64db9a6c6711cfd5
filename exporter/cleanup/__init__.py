"""The safety net: every write to asynq's keys. The pure removal rule (rule), the Redis operations
conditional on what was seen (store), the registration observer (a source of events), the exit
reaper and the orphan remover (sinks of the tracker's decisions), read-backs (confirm), the
decision sink that routes to them (sink), and the fleet sweep (sweep).

Imports asynq/, lifecycle/ (events), redisio/, metrics/ and the settings; not server/ or cli/.
"""

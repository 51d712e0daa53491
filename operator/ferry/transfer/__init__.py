"""The agent-to-agent (VM-to-VM) migration data channel.

- ``auth``: challenge-response over a per-migration secret (HMAC-SHA256, both nonces, id,
  the channel asked for)
- ``channel``: what frames travel in: AES-256-GCM records (default) or plain
- ``framing``: frame header with kind, block index, length, checksums
- ``bitmap``: dirty bitmaps and extent coalescing
- ``digest``: per-block hashes and image digests
- ``ratelimit``: token bucket
- ``policy``: PURE convergence/throttle decision
- ``session``: what both ends share (states, errors, extent size)
- ``source``: the sending engine (pre-copy rounds, pause, verification)
- ``target``: the receiving engine (checks and writes every block, answers the verdict)
"""

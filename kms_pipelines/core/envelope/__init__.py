"""Envelope encryption: P3 (a DEK per object), R3 (rewrap sweep, export keys), T2 (data keys
kept until no ciphertext depends on them).

data_keys (encrypt, decrypt, sweep, dek_inventory_frame), leases (sweep shard leases across
hosts), export_keys (temporary export keys rotated at expiry).
"""

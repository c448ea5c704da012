"""xDS: sans-I/O stream state, snapshot cache, generators (pure model -> protobuf) and the ADS server."""

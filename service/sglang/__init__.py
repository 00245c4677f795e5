"""SGLang behind kvbuffer: the engine adapter (`engine: sglang`), the mapping of the service settings to SGLang's
server arguments, and the KVBuffer plugin that SGLang's processes load. SGLang is imported only where it runs."""

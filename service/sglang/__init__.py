"""SGLang glue, kept in one place: the engine adapter (`engine: sglang`), the mapping of the service settings to
SGLang's server arguments, and the plugin that makes SGLang's Gated DeltaNet layers decode with the KVBuffer kernels
(`plugin`, loaded by every SGLang process). Importing this package imports no SGLang module."""

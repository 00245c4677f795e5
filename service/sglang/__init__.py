"""SGLang glue, kept in one place: the engine adapter (`engine`) and the plugin that makes SGLang's Gated DeltaNet
layers decode with the KVBuffer kernels (`plugin`). Importing this package imports no SGLang module."""

"""The only part of FluidMoE that knows Megatron's spec system: spec transformation, the
registration hook called by the patched `get_gpt_decoder_layer_specs`, build-time validation,
layer info and the training-log hook."""

"""Quantisation techniques (RTN, GPTQ, LLM.int8(), SmoothQuant, GOBO, Q-BERT, PEG, ZeroQuant, HAWQ, mixed 16/8)."""

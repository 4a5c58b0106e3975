"""momentum_study"""

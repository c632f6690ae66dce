"""Experiment configs and prompt batteries, installed as ``steercmp_experiments`` package data."""

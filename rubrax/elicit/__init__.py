"""Host-side rubric elicitation: chat client, prompt templates, propose / refine (RTD) / verify."""
